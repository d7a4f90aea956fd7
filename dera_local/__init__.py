"""dera-local: decoding-time realignment (DeRa) of GGUF models on llama.cpp.

import dera_local
with dera_local.load_pair("aligned.gguf", "reference.gguf") as pair:
    print(pair.generate("Hello", lam=0.5).text)
"""

from .analysis.sweep import LambdaSweep, SweepRow, sweep
from .chat import ChatSession, ChatTemplate
from .engine import mixing
from .engine.decoder import BatchDecoder
from .engine.request import GenerationRequest
from .errors import BadParameterError, DeraError, IncompatibleModelsError, ModelFileError
from .llama.gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from .model_sets.base import ModelSet
from .model_sets.guard import PairBusyError, PairClosedError
from .model_sets.mixture import Mixture, load_mixture, load_proxy
from .model_sets.pair import DeraPair, GenerationResult, GenerationStream, load_pair
from .sampling.chain import SamplingParams
from .speculation.drafts import SpeculationParams

__all__ = [
    "BadParameterError",
    "BatchDecoder",
    "ChatSession",
    "ChatTemplate",
    "DeraError",
    "DeraPair",
    "GGUFInfo",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStream",
    "IncompatibleModelsError",
    "LambdaSweep",
    "Mixture",
    "ModelFileError",
    "ModelSet",
    "PairBusyError",
    "PairClosedError",
    "SamplingParams",
    "SpeculationParams",
    "SweepRow",
    "check_same_tokenizer",
    "load_mixture",
    "load_pair",
    "load_proxy",
    "mixing",
    "read_gguf",
    "sweep",
]
