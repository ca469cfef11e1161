"""Checks that a prompt's media placeholders match the media, run before any tower does work."""

from __future__ import annotations

from torch import Tensor


def check_placeholders(input_ids: Tensor, checks) -> None:
    """`checks`: `(token_name, token_id, expected_count_or_None, what, how)` per media kind, where
    None means no such media was given and `how` says where the expected count came from."""
    for token, tid, expected, what, how in checks:
        n = int((input_ids == tid).sum())
        if expected is None and n:
            raise ValueError(f"the prompt has {n} {token} placeholder(s) but no {what} input was given")
        if expected is not None and n != expected:
            raise ValueError(
                f"placeholder count mismatch: the prompt has {n} {token} tokens but the {what} input makes "
                f"{expected} ({how}); build input_ids and media together (the processor or model.prepare)"
            )


def merged_tokens(grid_thw: Tensor | None, merge: int) -> int | None:
    """Tokens the vision tower makes for `grid_thw` `[n_items, 3]` (patches / merge**2)."""
    return None if grid_thw is None else int(grid_thw.prod(-1).sum()) // merge**2


def check_patch_rows(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> None:
    for pv, grid, what in ((pixel_values, image_grid_thw, "pixel_values"), (pixel_values_videos, video_grid_thw, "pixel_values_videos")):
        if pv is not None and (grid is None or pv.shape[0] != int(grid.prod(-1).sum())):
            expected = None if grid is None else int(grid.prod(-1).sum())
            raise ValueError(f"{what} has {pv.shape[0]} patch rows but its grid_thw says {expected}")
