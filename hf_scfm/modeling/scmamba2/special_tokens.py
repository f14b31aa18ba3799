"""The special tokens every hf-scfm vocabulary starts with, and the value conventions.

Gene tokens follow the special tokens, so these ids are the same for every species and every
vocabulary built by :class:`hf_scfm.GeneTokenizer`.
"""

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"

#: In id order: ``<pad>`` is 0, ``<mask>`` 1, ``<cls>`` 2, ``<eos>`` 3, ``<unk>`` 4, ``<bos>`` 5.
SPECIAL_TOKENS = [PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN, UNK_TOKEN, BOS_TOKEN]
PAD_TOKEN_ID, MASK_TOKEN_ID, CLS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID, BOS_TOKEN_ID = range(6)

#: Value given to special tokens and padding in the ``values`` tensor.
SPECIAL_VALUE = 0.0
#: Value that marks a *masked* expression value in ``values`` (masked-expression and
#: masked-regression objectives). Real values are never negative, so it cannot collide.
MASK_VALUE = -1.0
#: Label value ignored by every loss (integer labels and float regression labels alike).
IGNORE_INDEX = -100

#: ``len(GeneTokenizer.from_species(...))`` of the shipped vocabularies: the six special tokens plus
#: GENCODE human v48 (78,894 genes) and mouse M37 (78,317 genes). Model configs default to these;
#: ``tests/test_tokenizer.py`` pins them to the tokenizer.
HUMAN_VOCAB_SIZE = 78_900
MOUSE_VOCAB_SIZE = 78_323
