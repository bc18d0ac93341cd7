"""The --dtype names a person may type, without importing torch (so `cake --help` answers at once)."""

ALIASES = {
    "f32": "float32", "float32": "float32", "fp32": "float32",
    "f16": "float16", "float16": "float16", "fp16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
CHOICES = ["auto", *ALIASES]
