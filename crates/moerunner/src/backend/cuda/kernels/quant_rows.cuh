// The activation quantizers' per-block arithmetic (spec/formats.md; formats/act_quant.rs bit for bit), shared by
// quant.cu (rows in global memory) and the fused small-batch kernel (decode.cu: rows staged in shared memory), and
// the UE8M0 encoding weight_quant.cu shares.
#pragma once

#define QT_NVFP4_GLOBAL_DIVISOR 2688.0f  // 448 * 6

// an E2M1 code's value: the code's exponent and mantissa bits placed into an f32 (value x 2^-126, subnormal for codes 0, 1)
__device__ __forceinline__ float qt_e2m1_value(u32 code) {
    return __uint_as_float(((code & 7u) << 22) | ((code & 8u) << 28)) * __uint_as_float(0x7E800000u);
}

// ue8m0::encode_ceil(s) as its scale 2^c (c the smallest with 2^c >= s, clamped to -127..127; s <= 0 or NaN:
// 2^-127, the scale of byte 0)
__device__ __forceinline__ float qt_ceil_pow2(float s) {
    if (!(s > 0.0f)) return __uint_as_float(1u << 22);
    const u32 bits = __float_as_uint(s);
    const int exp_field = (int)(bits >> 23);
    int c;
    if (exp_field == 0) c = s > __uint_as_float(1u << 22) ? -126 : -127;
    else if (exp_field == 255) c = 127;
    else c = exp_field - 127 + ((bits & 0x7fffffu) ? 1 : 0);
    c = c < -127 ? -127 : (c > 127 ? 127 : c);
    return c == -127 ? __uint_as_float(1u << 22) : __uint_as_float((u32)(c + 127) << 23);
}

// ue8m0::encode_ceil(s) as its byte c + 127 (0 for s <= 0 or NaN): the scale's f32 exponent field, which is 0 for
// byte 0's scale 2^-127 (a subnormal). The weight quantizer's (weight_quant.cu).
__device__ __forceinline__ u32 ue8m0_ceil_byte(float s) { return __float_as_uint(qt_ceil_pow2(s)) >> 23; }

// A 32-column mxfp8 block's scale from the max of its |x| bit patterns: ceil-pow2(amax / 448) (UE8M0); amax = 0
// -> 2^-127 (byte 0), and NaN -> encode_ceil(NaN) = byte 0 as well
__device__ __forceinline__ float qt_mxfp8_scale(u32 amax_bits) {
    return amax_bits == 0u ? __uint_as_float(1u << 22) : qt_ceil_pow2(div_rn(__uint_as_float(amax_bits), 448.0f));
}

// x quantized to mxfp8 with its block's scale s, as the bf16 of the element's value (exact short of bf16's
// subnormals: an E4M3 value times 2^s is a bf16 value)
__device__ __forceinline__ u16 qt_mxfp8_as_bf16(float x, float s) {
    return f32_to_bf16(e4m3_to_f32(f32_to_e4m3(div_rn(x, s))) * s);
}

// 16 values of one nvfp4 block with global g -> 16 bf16 (the element times the decoded block scale)
__device__ __forceinline__ void qt_nvfp4_block(const float* v, float g, u16* o) {
    const float amax = __uint_as_float(amax_bits16(v));
    const u8 b = f32_to_e4m3(div_rn(div_rn(amax, 6.0f), g));
    const float sdec = e4m3_to_f32(b);
    const float s = sdec * g;
    const E2m1Divisor d = E2m1Divisor::of(s);
    // each element's value from its code: by the reciprocal where that gives the divided code, else divided
    // (s = 0: code 0)
    auto store = [&](auto code_of) {
#pragma unroll
        for (int k = 0; k < 16; ++k) o[k] = f32_to_bf16(qt_e2m1_value(code_of(v[k])) * sdec);
    };
    if (d.by_reciprocal()) {
        store([&](float x) { return d.code(x); });
    } else {
        store([&](float x) { return s == 0.0f ? 0u : e2m1_code(div_rn(x, s)); });
    }
}
