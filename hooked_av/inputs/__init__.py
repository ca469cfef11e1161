"""From media to model inputs (`prepare`), and the `TokenMap` that names every position."""

from hooked_av.inputs.chat import ChatTokens
from hooked_av.inputs.media import Audio, Video, load_audio, load_image, load_video
from hooked_av.inputs.token_map import GROUPS, Selection, TokenMap

__all__ = ["Audio", "ChatTokens", "GROUPS", "Selection", "TokenMap", "Video", "load_audio", "load_image", "load_video"]
