"""dera-local: decoding-time realignment (DeRa) of GGUF models on llama.cpp.

import dera_local
with dera_local.load_pair("aligned.gguf", "reference.gguf") as pair:
    print(pair.generate("Hello", lam=0.5).text)
"""

from .chat import ChatSession, ChatTemplate
from .engine import mixing
from .errors import BadParameterError, DeraError, IncompatibleModelsError, ModelFileError
from .llama.gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from .model_sets.guard import PairBusyError, PairClosedError
from .model_sets.pair import DeraPair, GenerationResult, GenerationStream, load_pair
from .sampling.chain import SamplingParams
from .speculation.drafts import SpeculationParams

__all__ = [
    "BadParameterError",
    "ChatSession",
    "ChatTemplate",
    "DeraError",
    "DeraPair",
    "GGUFInfo",
    "GenerationResult",
    "GenerationStream",
    "IncompatibleModelsError",
    "ModelFileError",
    "PairBusyError",
    "PairClosedError",
    "SamplingParams",
    "SpeculationParams",
    "check_same_tokenizer",
    "load_pair",
    "mixing",
    "read_gguf",
]
