"""The float dtype names every command and config accepts, without importing torch (the config
checks them before torch loads): each name -> the canonical one, which is also torch's attribute."""

from __future__ import annotations

DTYPE_NAMES: dict[str, str] = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
