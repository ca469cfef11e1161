"""Views that aggregate (token group x token group per layer and head) and the HTML report."""

from hooked_av.viz.attention_mass import group_attention_mass, plot_attention_mass
from hooked_av.viz.report import Report

__all__ = ["Report", "group_attention_mass", "plot_attention_mass"]
