"""Write tiny random-weight Hugging Face models (``save_pretrained`` directories), one per
component that ``qcexport convert --hf`` supports, so that the whole chain can be tried
without downloading anything:

    python scripts/make_tiny_hf.py out/tiny-hf
    qcexport convert --hf out/tiny-hf/blip2 --component qformer -o out/blip2
    qcexport golden --hf out/tiny-hf/blip2 --component qformer -o out/golden-blip2
    qcexport parity out/blip2 --golden out/golden-blip2

Sizes: hidden 32-64, 1-2 layers, 32x32 images in 8x8 patches (16 patches, 17 visual tokens
where the vision tower has a CLS token). Weights are seeded, so a directory is the same on
every run. transformers initialises for training (std 0.02 projections, latents of ones, the
Idefics gates alpha at zero), which makes tiny outputs nearly constant and the gated
cross-attention layer an identity; here every matrix is redrawn at std 1/sqrt(fan_in) and the
gates are opened, so that parity checks real math.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Which directory each component reads (several components share one model).
DIRS = {
    "qformer": "blip2",
    "instructblip-qformer": "instructblip",
    "idefics-resampler": "idefics",
    "idefics-gated-xattn": "idefics",
    "idefics2-resampler": "idefics2",
    "kosmos2-projection": "kosmos2",
}

_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
_OPT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 1, "ffn_dim": 64,
        "num_attention_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32}
_QFORMER = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 32,
            "cross_attention_frequency": 1, "max_position_embeddings": 64}


def _blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(vision_config=_VISION, qformer_config=_QFORMER,
                         text_config={"model_type": "opt", **_OPT}, num_query_tokens=8)
    return Blip2ForConditionalGeneration(config)


def _instructblip():
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig(vision_config=_VISION, qformer_config=_QFORMER,
                                text_config={"model_type": "opt", **_OPT}, num_query_tokens=8)
    return InstructBlipForConditionalGeneration(config)


def _idefics():
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config = IdeficsConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, cross_layer_interval=1,
        use_resampler=True,
        vision_config={"embed_dim": 32, "image_size": 32, "patch_size": 8,
                       "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 8,
                          "resampler_depth": 2, "resampler_n_heads": 2,
                          "resampler_head_dim": 16},
    )
    model = IdeficsForVisionText2Text(config)
    return model


def _idefics2():
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    text = {"model_type": "mistral", "vocab_size": 99, "hidden_size": 64,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 64}
    config = Idefics2Config(
        vision_config=_VISION, text_config=text,
        perceiver_config={"hidden_size": 64, "resampler_n_latents": 8, "resampler_depth": 2,
                          "resampler_n_heads": 2, "resampler_head_dim": 16,
                          "num_key_value_heads": 1},
    )
    return Idefics2ForConditionalGeneration(config)


def _kosmos2():
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    config = Kosmos2Config(
        vision_config=_VISION, latent_query_num=8,
        text_config={"vocab_size": 99, "embed_dim": 32, "layers": 1, "ffn_dim": 64,
                     "attention_heads": 2, "max_position_embeddings": 64},
    )
    return Kosmos2ForConditionalGeneration(config)


def _spread(model, seed: int) -> None:
    """Redraw every matrix at std 1/sqrt(fan_in) (activations stay O(1) and differ per token)
    and open every gate (alpha_*) to tanh^-1 of 0.5..0.8."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.rsplit(".", 1)[-1].startswith("alpha_"):
                p.copy_(0.55 + 0.55 * torch.rand(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


MAKERS = {"blip2": _blip2, "instructblip": _instructblip, "idefics": _idefics,
          "idefics2": _idefics2, "kosmos2": _kosmos2}


def make(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny model ``name`` (a key of MAKERS) to ``out`` with save_pretrained."""
    import torch

    torch.manual_seed(seed)
    model = MAKERS[name]().eval()
    _spread(model, seed)
    out = Path(out)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write one subdirectory per model")
    parser.add_argument("--only", choices=sorted(MAKERS), action="append",
                        help="write only these models (repeatable)")
    args = parser.parse_args()
    for name in args.only or MAKERS:
        path = make(name, args.out / name)
        components = [c for c, d in DIRS.items() if d == name]
        print(f"{path}  (--component {', '.join(components)})")


if __name__ == "__main__":
    main()
