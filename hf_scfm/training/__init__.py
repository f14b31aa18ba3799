"""Training and sharing: Accelerate pretraining (:mod:`.pretrain`, its data streams :mod:`.pretrain_data`, its log
:mod:`.run_log`), Trainer + LoRA fine-tuning (:mod:`.finetune`, adversarial batch removal :mod:`.adversarial`),
resumable training state and checkpoints (:mod:`.checkpoint`), the family registry (:mod:`.families`), Hub pushes
(:mod:`.hub`) and model cards (:mod:`.model_card`).

Nothing heavy is imported here: ``import hf_scfm.training`` costs nothing until a submodule is used.
"""

from .families import FAMILIES, Family, get_family

__all__ = ["FAMILIES", "Family", "get_family"]
