"""Quantized weights (int4 / int8 linear layers, an int8 embedding tied to the LM head) and an int8 KV cache.

    modes        WeightMode (what the user asks for) -> WeightFormat per tensor
    int4, int8   packed formats, conversions from GGUF blocks or floats, and the packed nn.Modules
    bf16         a GGUF's quantized embedding / LM head kept as a bf16 table (AUTO), not re-rounded to int8
    int4_unpack  reading codes back from the CPU int4 kernel's layout (prefill dequantizes from it)
    compute      when a packed layer calls the int kernel and when it dequantizes for one bf16 GEMM
    convert      quantization as a module swap: pack_weight, swap_modules, quantize_model
    kv_int8      Int8KVCache, a drop-in for layers.attention.KVCache
"""
