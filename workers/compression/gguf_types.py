"""The GGUF export step as data: its vocabulary and the rules checked when a job is submitted.

Torch-free (pydantic only), so the API validates an ``export`` step without loading an engine.

What ``type: "auto"`` means
---------------------------
After a ``quantize`` step the export carries the step's own integer codes and scales into GGUF
blocks (llama.cpp's ``block_q4_0`` etc., 32 weights along the input dimension each) with no
re-rounding, where the layouts match:

* symmetric int4 (``w4a16``) -> ``Q4_0``: ``x = d * (q - 8)``, ``q`` in 0..15, ``d`` fp16;
* asymmetric int4 -> ``Q4_1``: ``x = d * q + m``, ``m = -d * (zero_point + 8)``;
* symmetric int8 (``w8a16``, and the int8 weights of ``w8a8``) -> ``Q8_0``: ``x = d * q``.

A group of 64 or 128 columns, or one scale per output channel, is several 32-blocks sharing one
scale: those are carried exactly too. What has no lossless GGUF form is refused here, naming the
fields: asymmetric int8 (``Q8_0`` has no zero-point) and FP8 (GGUF has no FP8 block type), unless
an explicit ``type`` asks for re-quantization. Without a quantize step ``auto`` means ``f16``
(llama.cpp's converter default).

The carry is exact only if every scale is a float16 value (GGUF block scales are fp16) and, for
``Q4_1``, ``d * (zero_point + 8)`` too: the quantize step must run under
:func:`workers.compression.weight_quant.gguf_exact_scales` when a GGUF export follows it.
"""

from __future__ import annotations

from typing import Any, Literal

# Types ModelPress writes. "auto" resolves to one of the others (resolve_export_type). The K-quants
# are made by llama.cpp's own quantizer (llama-cpp-python) from an F16 export; the rest in Python
# with the `gguf` package's reference quantizers (bit-exact with ggml's *_ref functions).
GGUF_TYPES: tuple[str, ...] = (
    "auto", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m",
)  # fmt: skip
FLOAT_TYPES = ("f32", "f16", "bf16")
K_QUANT_TYPES = ("q6_k", "q5_k_m", "q4_k_m")
# The GGUF block types a quantize step's integer codes can be carried into without re-rounding.
CARRY_TYPES = ("q8_0", "q4_1", "q4_0")

GgufType = Literal["auto", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m"]
FullPrecisionPolicy = Literal["llama.cpp", "q8_0", "f16"]


def resolve_export_type(requested: str, quantize: dict[str, Any] | None) -> str:
    """The concrete GGUF type of an export step, or :class:`ValueError` with a message for the user.

    ``quantize``: the preceding quantize step's parameters as a plain dict (``scheme`` in
    w8a16/w4a16/w8a8/fp8, ``algorithm``, ``group_size`` int or None, ``symmetric``, ``ignore``),
    or ``None`` when the recipe has no quantize step.
    """
    if requested not in GGUF_TYPES:
        raise ValueError(f"type {requested!r} is not a GGUF type ModelPress writes; use one of {', '.join(GGUF_TYPES)}")
    if requested != "auto":
        return requested  # explicit: re-quantized where the codes cannot be carried
    if quantize is None:
        return "f16"  # nothing to carry: llama.cpp's converter default
    scheme = quantize.get("scheme")
    symmetric = bool(quantize.get("symmetric", True))
    group_size = quantize.get("group_size")  # 'auto' picks 128, 64 or 32: whole blocks of 32 either way
    if isinstance(group_size, int) and group_size % 32:
        raise ValueError(
            f"group_size {group_size} cannot be stored losslessly in GGUF blocks of 32; "
            "use a group_size that is a multiple of 32 or an explicit type such as q8_0"
        )
    if scheme == "w4a16":
        return "q4_0" if symmetric else "q4_1"
    if scheme == "w8a16":
        if not symmetric:
            raise ValueError(
                "scheme w8a16 with symmetric false cannot be stored losslessly as GGUF: Q8_0 has no "
                "zero-point; use symmetric true, or type q8_0 to re-quantize"
            )
        return "q8_0"
    if scheme == "w8a8":
        return "q8_0"  # int8 per-channel weights; llama.cpp quantizes activations itself, per 32 values
    if scheme == "fp8":
        raise ValueError(
            "scheme fp8 cannot be stored losslessly as GGUF (it has no FP8 block type); "
            "use type f16, bf16 or q8_0 to re-quantize"
        )
    raise ValueError(f"quantize scheme {scheme!r} has no GGUF mapping; name an explicit type")
