"""Views of attention: aggregated ones that grow with what is shown (token group x token group per layer
and head; one query over time, over a frame's patches, over audio time), circuitsvis for a few hundred
positions, expert routing per token group (mixture-of-experts models), and the self-contained HTML report."""

from hooked_av.viz.attention_mass import group_attention_mass, plot_attention_mass
from hooked_av.viz.circuitsvis_views import OfflinePage, attention_heads, attention_pattern
from hooked_av.viz.frame_views import frame_image, plot_attention_on_frame
from hooked_av.viz.mass_views import plot_group_mass_heads
from hooked_av.viz.reading import QueryAttention, query_attention, token_labels
from hooked_av.viz.report import Report
from hooked_av.viz.routing import plot_routing, routing_counts, routing_report, top_experts
from hooked_av.viz.time_views import audio_spectrogram, plot_attention_on_audio, plot_attention_over_time, time_bins

__all__ = [
    "OfflinePage", "QueryAttention", "Report", "attention_heads", "attention_pattern", "audio_spectrogram",
    "frame_image", "group_attention_mass", "plot_attention_mass", "plot_attention_on_audio", "plot_attention_on_frame",
    "plot_attention_over_time", "plot_group_mass_heads", "plot_routing", "query_attention", "routing_counts",
    "routing_report", "time_bins", "token_labels", "top_experts",
]
