//! Batch planning from token counts alone; the twin of python/otterfast/data/batching.py (same rules,
//! same tie-breaking, tested equal).

use crate::error::{Error, Result};

/// Best-fit-decreasing over windows of `window` samples: in decreasing length (ties: order), each sample
/// goes to the open row with the least room that still fits, else a new row. Each window's least-full row
/// (most room; ties: the later row) is carried into the next window (see batching.plan_rows).
pub fn plan_rows(
    lengths: &[u32],
    order: &[u32],
    capacity: u32,
    window: usize,
) -> Result<Vec<Vec<u32>>> {
    check_order(lengths, order)?;
    let window = window.max(1);
    let mut rows = Vec::new();
    let mut carried: Option<(Vec<u32>, u32)> = None;
    for (ci, chunk) in order.chunks(window).enumerate() {
        let mut ranked: Vec<usize> = (0..chunk.len()).collect();
        ranked.sort_by_key(|&i| (std::cmp::Reverse(lengths[chunk[i] as usize]), i));
        let mut bins: Vec<Vec<u32>> = Vec::new();
        let mut room: Vec<u32> = Vec::new();
        if let Some((b, r)) = carried.take() {
            bins.push(b);
            room.push(r);
        }
        for i in ranked {
            let s = chunk[i];
            let n = lengths[s as usize];
            if n > capacity {
                return Err(Error::Invalid(format!(
                    "sample row {s} has {n} tokens, more than the packing capacity {capacity}"
                )));
            }
            let mut best: Option<usize> = None;
            let mut best_room = capacity + 1;
            for (b, &r) in room.iter().enumerate() {
                if n <= r && r < best_room {
                    best = Some(b);
                    best_room = r;
                }
            }
            match best {
                Some(b) => {
                    bins[b].push(s);
                    room[b] -= n;
                }
                None => {
                    bins.push(vec![s]);
                    room.push(capacity - n);
                }
            }
        }
        let last = (ci + 1) * window >= order.len();
        if !last {
            if let Some(k) = (0..bins.len()).max_by_key(|&b| (room[b], b)) {
                carried = Some((bins.remove(k), room.remove(k)));
            }
        }
        rows.extend(bins);
    }
    Ok(rows)
}

/// Every sample row of `order` must have a length: checked once here, so the planner indexes freely.
fn check_order(lengths: &[u32], order: &[u32]) -> Result<()> {
    match order.iter().find(|&&s| s as usize >= lengths.len()) {
        Some(bad) => Err(Error::Invalid(format!(
            "sample row {bad} out of range ({} samples)",
            lengths.len()
        ))),
        None => Ok(()),
    }
}

pub type Batch = Vec<Vec<u32>>;

pub fn plan_batches(
    lengths: &[u32],
    order: &[u32],
    batch_size: usize,
    pack: bool,
    capacity: u32,
    window: usize,
) -> Result<Vec<Batch>> {
    let rows = if pack {
        plan_rows(lengths, order, capacity, window)?
    } else {
        check_order(lengths, order)?;
        order.iter().map(|&s| vec![s]).collect()
    };
    Ok(rows.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect())
}

/// Rank r takes batches r, r + world, ...; with `even`, the batches that do not fill a round are dropped.
pub fn shard_batches(
    batches: Vec<Batch>,
    rank: usize,
    world: usize,
    even: bool,
) -> Result<(Vec<Batch>, usize)> {
    if world == 0 || rank >= world {
        return Err(Error::Invalid(format!("rank {rank} not in [0, {world})")));
    }
    let n = if even {
        batches.len() - batches.len() % world
    } else {
        batches.len()
    };
    let dropped = batches.len() - n;
    let mine = batches
        .into_iter()
        .take(n)
        .skip(rank)
        .step_by(world)
        .collect();
    Ok((mine, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing() {
        let lengths = [5, 3, 4, 2, 6, 1];
        let order = [0, 1, 2, 3, 4, 5];
        let rows = plan_rows(&lengths, &order, 7, 100).unwrap();
        // 6 -> new; 5 -> new; 4 -> new; 3 -> row of 4 (room 3); 2 -> row of 5 (room 2); 1 -> row of 6 (room 1)
        assert_eq!(rows, vec![vec![4, 5], vec![0, 3], vec![2, 1]]);
        assert!(plan_rows(&lengths, &order, 5, 100).is_err());
        assert!(plan_batches(&lengths, &[0, 6], 1, false, 7, 100).is_err());
    }

    #[test]
    fn shards_even() {
        let batches: Vec<Batch> = (0..7).map(|i| vec![vec![i]]).collect();
        let (a, d) = shard_batches(batches.clone(), 1, 3, true).unwrap();
        assert_eq!((a, d), (vec![vec![vec![1]], vec![vec![4]]], 1));
        let (b, d) = shard_batches(batches.clone(), 0, 3, false).unwrap();
        assert_eq!((b.len(), d), (3, 0));
        // a bad rank or an empty world is an error, not a division by zero
        assert!(shard_batches(batches.clone(), 3, 3, true).is_err());
        assert!(shard_batches(batches, 0, 0, true).is_err());
    }
}
