"""Adapters between Hugging Face checkpoints and lmforge models: one per family, all of one shape.

Each family file (gpt.py, llama.py, bert.py, t5.py) holds its mapping table and a `StateDictAdapter`
(hf/common.py); `ADAPTERS` registers them under our family names, and `load.py`, `save.py` and `gguf.py`
reach every family through it.
"""

from lmforge.hf.bert import BertAdapter
from lmforge.hf.common import StateDictAdapter
from lmforge.hf.gpt import GPTAdapter
from lmforge.hf.llama import LlamaAdapter
from lmforge.hf.t5 import T5Adapter

ADAPTERS: dict[str, StateDictAdapter] = {
    "gpt": GPTAdapter(),
    "llama": LlamaAdapter(),
    "bert": BertAdapter(),
    "roberta": BertAdapter(),
    "t5": T5Adapter(),
}
