"""Training and sharing: Accelerate pretraining (:mod:`.pretrain`), Trainer + LoRA fine-tuning (:mod:`.finetune`),
the family registry (:mod:`.families`), Hub pushes (:mod:`.hub`) and
model cards (:mod:`.model_card`).

Nothing heavy is imported here: ``import hf_scfm.training`` costs nothing until a submodule is used.
"""

from .families import FAMILIES, Family, get_family

__all__ = ["FAMILIES", "Family", "get_family"]
