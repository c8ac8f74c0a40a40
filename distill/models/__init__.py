"""Model plugins. A family is one module here and one registration line below.

Families are registered by path: the plugin's module (and its model library) is imported only
when a plugin is built, never when a config is loaded.
"""

from distill.registry import register_model

DIFFUSERS_ATTENTION_BACKENDS = (
    "flash", "flash_hub", "flash_varlen", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3",
    "_flash_3_hub", "_flash_3_varlen_hub", "aiter_fa2_hub", "flex", "native", "_native_cudnn", "_native_efficient",
    "_native_flash", "_native_math", "_native_npu", "_native_xla", "sage", "sage_hub", "sage_blackwell_hub",
    "sage_varlen", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton", "xformers",
)
"""diffusers 0.42's AttentionBackendName values, written out so that loading a config imports no diffusers
(tests/test_wan.py keeps them equal)."""

register_model("wan", "distill.models.wan:WanPlugin", num_train_timesteps=1000,
               presets=("tiny", "small", "medium", "medium-deep", "shapes", "wan2.1-1.3b", "wan2.1-14b",
                        "wan2.2-ti2v-5b", "tiny-ti2v", "wan2.2-a14b", "tiny-a14b"),
               attention_backends=DIFFUSERS_ATTENTION_BACKENDS)
