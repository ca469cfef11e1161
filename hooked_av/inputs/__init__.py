"""Family-agnostic inputs: media decoding, chat structure, the prompt objects (`Prompt`, `Item`) and
the `TokenMap` that names every position. Each family's prompt building and TokenMap builder live in
`hooked_av.families.<family>`."""

from hooked_av.inputs.chat import ChatTokens
from hooked_av.inputs.media import Audio, Video, load_audio, load_image, load_video
from hooked_av.inputs.prompt import Item, Prompt
from hooked_av.inputs.token_map import GROUPS, Selection, TokenMap

__all__ = [
    "Audio", "ChatTokens", "GROUPS", "Item", "Prompt", "Selection", "TokenMap", "Video", "load_audio", "load_image",
    "load_video",
]
