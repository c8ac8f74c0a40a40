"""Wan's in-code size presets (`model.preset`, random weights): test sizes, and the released architectures of
Wan 2.1 (T2V 1.3B, 14B) and Wan 2.2 (TI2V-5B, T2V-A14B) for benchmarks; real weights come from `model.path`."""

from __future__ import annotations

_TINY_TEXT = dict(
    vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
)
_UMT5_XXL = dict(  # Wan 2.1's text encoder
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
)
_WAN21_TRANSFORMER = dict(  # what Wan 2.1's full-size transformers share; heads of 128, widths and depths differ
    patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
_WAN22_VAE = dict(  # what the Wan 2.2 VAE's structure adds to 2.1's: 2 x 2 patchified pixels, residual blocks
    is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    temperal_downsample=[False, True, True],
)
_WAN21_14B = dict(_WAN21_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # also each A14B expert
_TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
    ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
_TINY_VAE = dict(  # the Wan 2.1 VAE's structure with 8 base channels and 4 latent ones
    base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)
_CPU_TRANSFORMER = dict(  # what the CPU demo's presets share: 4 heads in 4 blocks over 4x4 patches; widths differ
    patch_size=(1, 4, 4), num_attention_heads=4, text_dim=32, freq_dim=32, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
_PART_SEEDS = {"transformer": 1, "vae": 2, "text_encoder": 3, "transformer_2": 4}
EXPERTS = ("transformer", "transformer_2")
"""A two-expert model's denoisers (Wan 2.2 A14B): high noise, then low noise, as WanPipeline names them."""
PRESETS: dict[str, dict] = {
    "tiny": dict(transformer=_TINY_TRANSFORMER, text_encoder=_TINY_TEXT, vae=_TINY_VAE),
    # CPU demos: 4x4 patches keep the token count low (5 x 8 x 8 at 5 x 32 x 32), so a 0.3M-parameter
    # model trains in minutes on two cores.
    "small": dict(transformer=dict(_CPU_TRANSFORMER, attention_head_dim=16, ffn_dim=256), text_encoder=_TINY_TEXT,
                  vae=_TINY_VAE),
    # Between the two: twice small's width (~1M parameters), a candidate for a teacher that a CPU demo can distil.
    "medium": dict(transformer=dict(_CPU_TRANSFORMER, attention_head_dim=32, ffn_dim=512), text_encoder=_TINY_TEXT,
                   vae=_TINY_VAE),
    # medium's width in 6 blocks (~1.7M parameters, 1.5 x its CPU cost): depth for the order of frames (issue 16).
    "medium-deep": dict(transformer=dict(_CPU_TRANSFORMER, attention_head_dim=32, ffn_dim=512, num_layers=6),
                        text_encoder=_TINY_TEXT, vae=_TINY_VAE),
    # The shapes world on a GPU: ~6M parameters, 4x4 patches.
    "shapes": dict(
        transformer=dict(
            patch_size=(1, 4, 4), num_attention_heads=8, attention_head_dim=32, text_dim=32, freq_dim=64,
            ffn_dim=1024, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        ),
        text_encoder=_TINY_TEXT,
        vae=_TINY_VAE,
    ),
    # The Wan2.1-T2V-1.3B architecture (random weights): 30 blocks, 12 heads of 128, UMT5-XXL text, Wan 2.1 VAE.
    "wan2.1-1.3b": dict(
        transformer=dict(_WAN21_TRANSFORMER, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        text_encoder=_UMT5_XXL,
        vae=dict(),
    ),
    # The Wan2.1-T2V-14B architecture (random weights): 40 blocks, 40 heads of 128 (width 5120), the same text
    # encoder and VAE.
    "wan2.1-14b": dict(
        transformer=_WAN21_14B,
        text_encoder=_UMT5_XXL,
        vae=dict(),
    ),
    # The Wan2.2-TI2V-5B architecture (random weights; its real latents_mean / latents_std come with model.path):
    # 30 blocks, 24 heads of 128, over the Wan 2.2 VAE's 48 latent channels. That VAE patchifies 2 x 2 pixels
    # into its 12 input channels and compresses 16 x in space (with the transformer's patches: 32 x), 4 x in time.
    "wan2.2-ti2v-5b": dict(
        transformer=dict(_WAN21_TRANSFORMER, num_attention_heads=24, ffn_dim=14336, num_layers=30),
        text_encoder=_UMT5_XXL,
        vae=dict(_WAN22_VAE, base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
    ),
    # The same kinds of component at test size: the 48-channel VAE's structure (patchified, residual) with 8.
    "tiny-ti2v": dict(
        transformer=_TINY_TRANSFORMER,
        text_encoder=_TINY_TEXT,
        vae=dict(_WAN22_VAE, base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 latents_mean=[0.0] * 8, latents_std=[1.0] * 8),
    ),
    # The Wan2.2-T2V-A14B architecture (random weights): two experts of the 14B architecture, `transformer` for the
    # timesteps at or above boundary_ratio · T (high noise) and `transformer_2` below, as WanPipeline switches them.
    "wan2.2-a14b": dict(
        transformer=_WAN21_14B,
        text_encoder=_UMT5_XXL,
        vae=dict(),
        boundary_ratio=0.875,
    ),
    # Two tiny experts, for tests.
    "tiny-a14b": dict(transformer=_TINY_TRANSFORMER, text_encoder=_TINY_TEXT, vae=_TINY_VAE, boundary_ratio=0.875),
}
