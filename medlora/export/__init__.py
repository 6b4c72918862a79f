"""Export a fine-tuned adapter out of the project: a merged Hugging Face folder, GGUF for llama.cpp, a LoRA GGUF, an Ollama folder.

    from medlora.export import export_adapter
    export_adapter("runs/cpu/adapter", "ollama", "exports/medlora-ollama", dtype="q8_0")
"""

from medlora.export.formats import FORMATS, ExportError, ExportResult, default_dtype, export_adapter, modelfile_text, scope_note
from medlora.export.gguf_lora import write_lora_gguf
from medlora.export.gguf_model import GGUF_DTYPES, NotLlamaError, check_llama, gguf_tensor_name, write_model_gguf
from medlora.export.gguf_tokenizer import UnknownTokenizerError, gguf_tokenizer
from medlora.export.rotary import rotary_permute, rotary_unpermute

__all__ = [
    "ExportError",
    "ExportResult",
    "FORMATS",
    "GGUF_DTYPES",
    "NotLlamaError",
    "UnknownTokenizerError",
    "check_llama",
    "default_dtype",
    "export_adapter",
    "gguf_tensor_name",
    "gguf_tokenizer",
    "modelfile_text",
    "rotary_permute",
    "rotary_unpermute",
    "scope_note",
    "write_lora_gguf",
    "write_model_gguf",
]
