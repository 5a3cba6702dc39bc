"""Training on DeepSpeed: `otterfast train CONFIG.yaml` (one process, torchrun, or the deepspeed launcher).

    config.py           the training config: typed sections, `--set` overrides, validation (loaded by otterfast.config)
    loop.py             the run: setup_data / setup_model / setup_engine, then train_step per optimizer step
    zero3_init.py       ZeRO-3: the model built partitioned under zero.Init, the checkpoint streamed into each rank
    deepspeed_setup.py  process environment, the DeepSpeed config, the engine
    optim.py            parameter groups (weight decay) and the LR schedule
    checkpoint.py       complete-or-absent checkpoints, resume, RNG state
    validation.py       the validation pass: token-mean loss over a held-out set (data/split.py), every eval_every steps
    quick_eval.py       eval_run: an `otterfast eval run` YAML on the model at each checkpoint, scores in the metrics
    metrics.py          per-step console line, metrics.jsonl, TensorBoard, wandb; MFU
    export.py           the consolidated transformers export (ZeRO-3 gathered)
    plot.py             loss and throughput curves (`otterfast plot`)
    cli.py              `otterfast train`, `otterfast plot`, `otterfast bench train`
"""
