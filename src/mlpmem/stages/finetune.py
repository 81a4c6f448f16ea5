"""Stage `finetune`: fine-tune the base LM on the train split (full or LoRA) before the datastore is built.

With --finetune.mode none (the default) it does nothing, and later stages use --model as given.
"""

from __future__ import annotations

import logging

from mlpmem.config import Config
from mlpmem.errors import ConfigError

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    if cfg.finetune.mode == "none":
        log.info("finetune: --finetune.mode none, nothing to do")
        return {}
    raise ConfigError(f"--finetune.mode {cfg.finetune.mode}: not implemented yet")
