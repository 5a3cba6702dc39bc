"""`otterfast data demo OUT`: a small but real MIMIC-IT dataset, in Otter's on-disk format, built from the
photos that scikit-image, scikit-learn and matplotlib ship, plus a tokenizer trained on its text.

Everything is deterministic (seeded). Questions are answerable from the pixels (what the photo is, the
dominant colour, colour vs greyscale, which part of the photo a crop shows, which way a "video" pans),
so that a model trained on it has something real to learn. The tables use every layout otterfast reads:

    DEMO_IMG     IMAGE_TEXT               parquet, pandas index, standard base64 (Otter's layout)
    DEMO_LEGACY  IMAGE_TEXT               legacy JSON {id: base64}
    DEMO_ICL     IMAGE_TEXT_IN_CONTEXT    parquet, `id` column, raw bytes; a train config with 2 examples
    DEMO_PAN     VIDEO_TEXT               a dask-style directory of part files, URL-safe base64
    DEMO_TXT     TEXT_ONLY                no images
"""

from __future__ import annotations

import base64
import colorsys
import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

# name, file (package-relative), description (what the photo shows; written by hand)
PHOTOS = [
    ("astronaut", "skimage:astronaut.png", "an astronaut in a white spacesuit in front of a flag"),
    ("cat", "skimage:chelsea.png", "a tabby cat"),
    ("coffee", "skimage:coffee.png", "a cup of coffee on a saucer"),
    ("cameraman", "skimage:camera.png", "a man standing behind a camera on a tripod"),
    ("coins", "skimage:coins.png", "a collection of old coins"),
    ("galaxies", "skimage:hubble_deep_field.jpg", "many distant galaxies in deep space"),
    ("motorcycle", "skimage:motorcycle_left.png", "a motorcycle parked indoors"),
    ("retina", "skimage:retina.jpg", "the back of a human eye, the retina"),
    ("rocket", "skimage:rocket.jpg", "a rocket standing on its launch pad"),
    ("moon", "skimage:moon.png", "the cratered surface of the moon"),
    ("bricks", "skimage:brick.png", "a wall of bricks"),
    ("grass", "skimage:grass.png", "a patch of grass"),
    ("gravel", "skimage:gravel.png", "a bed of gravel"),
    ("temple", "sklearn:china.jpg", "a temple roof among trees"),
    ("flower", "sklearn:flower.jpg", "a flower in bloom"),
    ("hopper", "matplotlib:grace_hopper.jpg", "a portrait of Grace Hopper in uniform"),
    ("phantom", "skimage:phantom.png", "a test phantom of nested ellipses"),
]


def _package_file(spec: str) -> str:
    pkg, name = spec.split(":")
    if pkg == "skimage":
        import skimage

        return os.path.join(os.path.dirname(skimage.__file__), "data", name)
    if pkg == "sklearn":
        import sklearn

        return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name)
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", name)


def colour_name(img: Image.Image) -> str:
    r, g, b = (np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.12:
        return "black" if v < 0.2 else "white" if v > 0.85 else "grey"
    hue = h * 360
    for limit, name in ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (200, "cyan"),
                        (260, "blue"), (300, "purple"), (340, "pink"), (361, "red")):
        if hue < limit:
            return name
    return "red"


def is_colour(img: Image.Image) -> bool:
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).mean() + np.abs(a[..., 1] - a[..., 2]).mean() > 4)


PARTS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}


@dataclass
class Crop:
    image: Image.Image
    photo: str
    desc: str
    part: str


def _encode(img: Image.Image, rng: np.random.Generator) -> bytes:
    """Varied encodings: JPEG (baseline / progressive / greyscale), PNG (RGB / RGBA / palette), WebP."""
    buf = io.BytesIO()
    k = rng.random()
    if k < 0.35:
        img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(70, 96)))
    elif k < 0.5:
        img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(70, 96)), progressive=True)
    elif k < 0.6:
        img.convert("L").save(buf, "JPEG", quality=90)
    elif k < 0.8:
        img.convert("RGB").save(buf, "PNG")
    elif k < 0.87:
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(buf, "PNG")
    elif k < 0.93:
        img.convert("RGB").quantize(64).save(buf, "PNG")
    else:
        img.convert("RGB").save(buf, "WEBP", quality=85)
    return buf.getvalue()


class DemoBuilder:
    def __init__(self, out: str, seed: int = 0, scale: float = 1.0):
        self.out = os.path.abspath(out)
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.photos = [(n, Image.open(_package_file(f)).convert("RGB"), d) for n, f, d in PHOTOS]

    def _n(self, n: int) -> int:
        return max(4, int(round(n * self.scale)))

    def crop(self, idx: int | None = None) -> Crop:
        rng = self.rng
        name, img, desc = self.photos[int(rng.integers(len(self.photos))) if idx is None else idx]
        W, H = img.size
        fw, fh = rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6)
        cw, ch = max(32, int(W * fw)), max(32, int(H * fh))
        qy, qx = int(rng.integers(2)), int(rng.integers(2))
        x0 = int(rng.integers(0, W // 2 - cw // 2 + 1)) if qx == 0 else int(rng.integers(W // 2 - cw // 2, W - cw + 1))
        y0 = int(rng.integers(0, H // 2 - ch // 2 + 1)) if qy == 0 else int(rng.integers(H // 2 - ch // 2, H - ch + 1))
        c = img.crop((x0, y0, x0 + cw, y0 + ch))
        s = rng.uniform(0.6, 1.6)  # varied output sizes, long side ~ 60..600 px
        c = c.resize((max(16, int(cw * s)), max(16, int(ch * s))), Image.BICUBIC)
        return Crop(c, name, desc, PARTS[(qy, qx)])

    def qa(self, c: Crop) -> list[tuple[str, str]]:
        col = colour_name(c.image)
        return [
            ("What is shown in this image?", f"This is part of a photo of {c.desc}."),
            ("What is the main colour of this picture?", f"The main colour is {col}."),
            ("Is this picture in colour or in black and white?",
             "It is in colour." if is_colour(c.image) else "It is in black and white."),
            ("Which part of the photo does this crop show?", f"It shows the {c.part} part of the photo of {c.photo}."),
        ]

    # ---- datasets ----------------------------------------------------------------------------------

    def build(self) -> dict:
        os.makedirs(self.out, exist_ok=True)
        texts: list[str] = []
        counts = {}
        counts["DEMO_IMG"] = self._image_text("DEMO_IMG", self._n(240), "parquet", texts)
        counts["DEMO_LEGACY"] = self._image_text("DEMO_LEGACY", self._n(40), "json", texts)
        counts["DEMO_ICL"] = self._in_context("DEMO_ICL", self._n(120), texts)
        counts["DEMO_PAN"] = self._video("DEMO_PAN", self._n(40), texts)
        counts["DEMO_TXT"] = self._text_only("DEMO_TXT", self._n(150), texts)
        self._write_yaml()
        build_demo_tokenizer(texts, os.path.join(self.out, "tokenizer"))
        return counts

    def _write_instructions(self, name: str, data: dict) -> str:
        path = os.path.join(self.out, f"{name}_instructions.json")
        with open(path, "w") as f:
            json.dump({"meta": {"version": "0.0.1", "author": "otterfast demo"}, "data": data}, f, indent=1)
        return path

    def _write_parquet(self, path: str, ids: list[str], blobs: list[bytes], layout: str) -> None:
        import pandas as pd

        if layout == "index_b64":  # Otter: pandas index = id, one `base64` column
            df = pd.DataFrame({"base64": [base64.b64encode(b).decode() for b in blobs]}, index=pd.Index(ids))
            df.to_parquet(path)
        elif layout == "index_b64url":
            df = pd.DataFrame({"base64": [base64.urlsafe_b64encode(b).decode() for b in blobs]}, index=pd.Index(ids))
            df.to_parquet(path)
        else:  # `id` column + raw bytes
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary())}), path, row_group_size=64)

    def _image_text(self, name: str, n_images: int, table: str, texts: list[str]) -> int:
        data, ids, blobs, photo_of = {}, [], [], []
        k = 0
        for i in range(n_images):
            c = self.crop()
            img_id = f"{name}_IMG_{i:05d}"
            ids.append(img_id)
            photo_of.append(c.photo)
            blobs.append(_encode(c.image, self.rng))
            qa = self.qa(c)
            pick = self.rng.choice(len(qa), size=2, replace=False)
            ins_ids = [f"{name}_INS_{k + j:05d}" for j in range(2)]
            for j, q in enumerate(pick):
                data[ins_ids[j]] = {"instruction": qa[q][0], "answer": qa[q][1], "image_ids": [img_id],
                                    "rel_ins_ids": [x for x in ins_ids if x != ins_ids[j]]}
                texts += qa[q]
            k += 2
        if table == "parquet":
            # a few two-image records: the images become frames of one media (Otter's IMAGE_TEXT layout)
            for i in range(0, min(20, n_images - 1), 2):
                same = photo_of[i] == photo_of[i + 1]
                data[f"{name}_INS_{k:05d}"] = {
                    "instruction": "Do these two pictures come from the same photo?",
                    "answer": f"Yes, both show the {photo_of[i]}." if same
                    else f"No: the first shows the {photo_of[i]}, the second the {photo_of[i + 1]}.",
                    "image_ids": [ids[i], ids[i + 1]], "rel_ins_ids": []}
                k += 1
            self._write_parquet(os.path.join(self.out, f"{name}.parquet"), ids, blobs, "index_b64")
        else:
            with open(os.path.join(self.out, f"{name}.json"), "w") as f:
                json.dump({i: base64.b64encode(b).decode() for i, b in zip(ids, blobs)}, f)
        self._write_instructions(name, data)
        return len(data)

    def _in_context(self, name: str, n_queries: int, texts: list[str]) -> int:
        data, ids, blobs, train = {}, [], [], {}
        n = n_queries * 3
        recs = []
        for i in range(n):
            c = self.crop()
            img_id = f"{name}_IMG_{i:05d}"
            ids.append(img_id)
            blobs.append(_encode(c.image, self.rng))
            recs.append((img_id, self.qa(c)))
        for q in range(n_queries):
            kind = int(self.rng.integers(4))  # the examples and the query ask the same kind of question
            group = [f"{name}_INS_{3 * q + j:05d}" for j in range(3)]
            for j, ins in enumerate(group):
                img_id, qa = recs[3 * q + j]
                data[ins] = {"instruction": qa[kind][0], "answer": qa[kind][1], "image_ids": [img_id],
                             "rel_ins_ids": [x for x in group if x != ins]}
                texts += qa[kind]
            train[group[2]] = group[:2]
        self._write_parquet(os.path.join(self.out, f"{name}.parquet"), ids, blobs, "id_raw")
        with open(os.path.join(self.out, f"{name}_train.json"), "w") as f:
            json.dump(train, f, indent=1)
        self._write_instructions(name, data)
        return len(train)

    def _video(self, name: str, n_videos: int, texts: list[str], frames: int = 8) -> int:
        data, ids, blobs = {}, [], []
        moves = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
        for v in range(n_videos):
            pname, img, desc = self.photos[int(self.rng.integers(len(self.photos)))]
            move = list(moves)[int(self.rng.integers(4))]
            dx, dy = moves[move]
            W, H = img.size
            cw, ch = W // 2, H // 2
            x0 = 0 if dx > 0 else W - cw if dx < 0 else (W - cw) // 2
            y0 = 0 if dy > 0 else H - ch if dy < 0 else (H - ch) // 2
            frame_ids = []
            n_frames = frames + int(self.rng.integers(-3, 4))  # varied lengths; resampled at prepare
            for t in range(n_frames):
                x = x0 + dx * t * (W - cw) // (n_frames - 1)
                y = y0 + dy * t * (H - ch) // (n_frames - 1)
                fr = img.crop((x, y, x + cw, y + ch)).resize((cw * 2 // 3, ch * 2 // 3), Image.BILINEAR)
                fid = f"{name}_IMG_v{v:04d}_{t:04d}"
                frame_ids.append(fid)
                ids.append(fid)
                blobs.append(_encode(fr, self.rng))
            qs = [("Which way does the camera move?", f"The camera pans {move}."),
                  ("What does this video show?", f"It moves across a photo of {desc}.")]
            for j, (q, a) in enumerate(qs):
                data[f"{name}_INS_{2 * v + j:05d}"] = {"instruction": q, "answer": a, "image_ids": frame_ids,
                                                      "rel_ins_ids": []}
                texts += [q, a]
        d = os.path.join(self.out, f"{name}.parquet")  # a directory, like dask's to_parquet
        os.makedirs(d, exist_ok=True)
        half = len(ids) // 2
        self._write_parquet(os.path.join(d, "part.0.parquet"), ids[:half], blobs[:half], "index_b64url")
        self._write_parquet(os.path.join(d, "part.1.parquet"), ids[half:], blobs[half:], "index_b64url")
        self._write_instructions(name, data)
        return len(data)

    def _text_only(self, name: str, n: int, texts: list[str]) -> int:
        data = {}
        words = ["cat", "moon", "rocket", "coffee", "flower", "galaxy", "temple", "gravel"]
        for i in range(n):
            k = int(self.rng.integers(3))
            a, b = int(self.rng.integers(0, 50)), int(self.rng.integers(0, 50))
            w = words[int(self.rng.integers(len(words)))]
            if k == 0:
                q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
            elif k == 1:
                q, ans = f"Spell the word {w} backwards.", f"Backwards, {w} is {w[::-1]}."
            else:
                q, ans = f"Which is larger, {a} or {b}?", (f"{max(a, b)} is larger." if a != b else "They are equal.")
            data[f"{name}_INS_{i:05d}"] = {"instruction": q, "answer": ans, "image_ids": [], "rel_ins_ids": []}
            texts += [q, ans]
        self._write_instructions(name, data)
        return n

    def _write_yaml(self) -> None:
        y = f"""# otterfast demo dataset, in Otter's MIMIC-IT layout (paths relative to this file)
IMAGE_TEXT:
  DEMO_IMG:
    mimicit_path: DEMO_IMG_instructions.json
    images_path: DEMO_IMG.parquet
    num_samples: -1
    task_description:
      - "Answer the question about the picture."
      - "Look at the image and reply."
  DEMO_LEGACY:
    mimicit_path: DEMO_LEGACY_instructions.json
    images_path: DEMO_LEGACY.json
    num_samples: 120
    task_description: "Answer the question about the picture."
IMAGE_TEXT_IN_CONTEXT:
  DEMO_ICL:
    mimicit_path: DEMO_ICL_instructions.json
    images_path: DEMO_ICL.parquet
    train_config_path: DEMO_ICL_train.json
    num_samples: 0
VIDEO_TEXT:
  DEMO_PAN:
    mimicit_path: DEMO_PAN_instructions.json
    images_path: DEMO_PAN.parquet
    num_samples: -1
TEXT_ONLY:
  DEMO_TXT:
    mimicit_path: DEMO_TXT_instructions.json
    num_samples: 100
"""
        with open(os.path.join(self.out, "data.yaml"), "w") as f:
            f.write(y)


DEMO_SPECIAL_TOKENS = ["<s>", "</s>", "<PAD>", "<image>", "<|endofchunk|>", "<answer>",
                       "<fake_token_around_image>", "<end_of_utterance>", "|SPEAKER|", "|NEWLINE|", "\x04"]


def build_demo_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 2048):
    """A byte-level BPE (like MPT's / GPT-2's) trained on the demo text, with every format's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    scaffolding = ["User:", " GPT:", " Assistant:", "[INST]", "[/INST]", "\n"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DEMO_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + scaffolding, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<PAD>",
        additional_special_tokens=DEMO_SPECIAL_TOKENS[3:],
    )
    fast.save_pretrained(out_dir)
    return fast


def build_demo(out: str, seed: int = 0, scale: float = 1.0) -> dict:
    return DemoBuilder(out, seed, scale).build()


# ---- pretraining shards (Otter's MMC4 / LAION layouts) -----------------------------------------------------

def _shard_image(img: Image.Image, rng: np.random.Generator) -> bytes:
    """A JPEG, or a PNG when the JPEG is 10 KB or less (Otter drops MMC4 images that small)."""
    b = _encode(img, rng)
    if len(b) // 1000 <= 10:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG")
        b = buf.getvalue()
    return b


def build_pretrain_shards(out: str, seed: int = 0, n_docs: int = 32, n_pairs: int = 96, n_shards: int = 2) -> str:
    """Webdataset shards from the demo photos, in Otter's pretraining layouts, and their dataset YAML:
    `docs/0000{0,1}.tar` (MMC4-style documents: 2-4 crops, each with sentences about it, matched_sim drawn so that
    some fall under the 0.32 threshold) and `pairs/0000{0,1}.tar` (caption + image; every third image stored as
    base64 text in a `.png` member, as Otter's converted shards do). Returns the YAML's path."""
    from .shard_writer import mmc4_member, pair_members, write_tar

    b = DemoBuilder(out, seed + 1000)
    rng = b.rng
    os.makedirs(out, exist_ok=True)
    docs: list[list] = [[] for _ in range(n_shards)]
    for i in range(n_docs):
        sentences, images = [], []
        for k in range(int(rng.integers(2, 5))):
            c = b.crop()
            col = colour_name(c.image)
            images.append((_shard_image(c.image, rng), len(sentences), float(rng.uniform(0.28, 0.45))))
            sentences += [f"This is part of a photo of {c.desc}.", f"The main colour is {col}.",
                          f"It shows the {c.part} part of the photo of {c.photo}."]
        docs[i % n_shards].append(mmc4_member(f"doc{i:05d}", sentences, images, url=f"demo://doc/{i}"))
    pairs: list[list] = [[] for _ in range(n_shards)]
    for i in range(n_pairs):
        c = b.crop()
        caption = f"A photo of {c.desc}, mostly {colour_name(c.image)}."
        img = _shard_image(c.image, rng)
        ext, as_b64 = ("png", True) if i % 3 == 0 else ("jpg", False)
        pairs[i % n_shards] += pair_members(f"pair{i:05d}", caption, img, ext=ext, as_base64=as_b64)
    for s in range(n_shards):
        write_tar(os.path.join(out, "docs", f"{s:05d}.tar"), docs[s])
        write_tar(os.path.join(out, "pairs", f"{s:05d}.tar"), pairs[s])
    last = f"{n_shards - 1:05d}"
    y = f"""# otterfast demo pretraining data: webdataset shards in Otter's MMC4 and LAION layouts (docs/data.md)
MMC4:
  demo_docs: {{shards: "docs/{{00000..{last}}}.tar", sim_threshold: 0.32, weight: 1.0}}
LAION:
  demo_pairs: {{shards: "pairs/{{00000..{last}}}.tar", weight: 0.5, loss_weight: 0.2}}
"""
    path = os.path.join(out, "pretrain.yaml")
    with open(path, "w") as f:
        f.write(y)
    return path
