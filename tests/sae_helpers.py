"""Small SAELens SAEs for tests: any registered architecture, random weights at SAELens's own initial scale
with every bias and threshold moved off its initial value (so a wrong bias or threshold shows), seeded.

    sae = random_sae("topk", d_in=128, d_sae=64, hook="blocks.1.hook_resid_post", seed=0, k=4)
"""

from __future__ import annotations

import warnings

import torch
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata

DEFAULTS = {"topk": {"k": 4}, "abstopk": {"k": 4}, "batchtopk": {"k": 4},
            "matryoshka_batchtopk": {"k": 4, "matryoshka_widths": [16]}}


def random_sae(architecture: str = "standard", d_in: int = 128, d_sae: int = 64, hook: str = "blocks.1.hook_resid_post",
               seed: int = 0, training: bool = False, **cfg):
    """An inference SAE (or SAELens's training class, `training=True`) of `architecture` reading `hook`."""
    cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(architecture)
    kw = dict(DEFAULTS.get(architecture, {}), **cfg)
    if "matryoshka_widths" in kw:
        kw["matryoshka_widths"] = [*kw["matryoshka_widths"], d_sae]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, model_name="test"), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "threshold" in name:  # JumpReLU: positive thresholds some pre-activations pass
                p.copy_(p + 0.05 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return sae.eval()


def toy_store(model, folder, hook: str = "blocks.1.hook_resid_post", n: int = 24, seed: int = 0, shard_tokens: int = 400,
              batch: int = 8):
    """An activation store of `n` toy samples (`toy.make_batch`), `hook`'s activations of every real token with the
    TokenMap's metadata, written by `StoreWriter` (what the harvest writes, until it lands). Ids "s{seed}-{i}"."""
    import numpy as np
    import pandas as pd

    from hooked_av.toy import make_batch
    from patching.datasets.activations import StoreWriter

    writer = StoreWriter(folder, {hook: model.cfg.d_model}, shard_tokens=shard_tokens,
                         settings={"model": "toy", "hooks": [hook], "seed": seed})
    done = 0
    while done < n:
        b = make_batch(min(batch, n - done), seed=seed + done, tokenizer=model.tokenizer)
        tm = model.token_map(b.inputs)
        with torch.no_grad():
            _, cache = model.run_with_cache(**b.inputs, names_filter=hook)
        df = tm.to_df()
        for r in range(tm.batch):
            keep = (b.inputs["attention_mask"][r] > 0).numpy()
            rows = df[df["row"] == r][keep].reset_index(drop=True)
            media = rows["group"].isin(["audio", "video", "image"])
            meta = pd.DataFrame({"id": f"s{seed}-{done + r}", "row": done + r, "pos": rows["pos"], "group": rows["group"],
                                 "item": rows["item"], "modality": rows["group"].where(media, "text"),
                                 "t_start": rows["time"], "t_end": rows["time_end"], "frame": rows["frame"],
                                 "patch_row": rows.get("patch_row", -1), "patch_col": rows.get("patch_col", -1),
                                 "chunk": rows["chunk"]})
            writer.add({hook: cache[hook][r][torch.from_numpy(np.asarray(keep))]}, meta)
        done += tm.batch
    writer.close()
    return folder
