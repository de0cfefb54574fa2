"""Training: ``medusa-liger train CONFIG.yaml [key=value ...]``.

    from medusa_liger.train import load_config, train
    result = train(load_config("configs/tiny.yaml", ["train.steps=100"]))

Modules: ``config`` (schema, YAML, overrides, validation), ``data`` (records, formats, chat
templates, loss masks), ``packing`` (rows with segment ids, cache, loader), ``tiny`` (the embedded
default's tokenizer and backbone), ``build`` (model, optimizer, schedule), ``loop`` (the trainer),
``checkpoint``, ``logging`` (progress bar, JSONL, wandb), ``plot``, ``cli``.
"""

from medusa_liger.train.config import Config, load_config


def train(cfg: Config):
    """Run a training job; see :func:`medusa_liger.train.loop.train`."""
    from medusa_liger.train.loop import train as _train

    return _train(cfg)


__all__ = ["Config", "load_config", "train"]
