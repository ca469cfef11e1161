"""A single self-contained HTML report: figures inlined as PNG, tables as HTML, text as <pre>."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; }
"""


class Report:
    """Collect sections, then `save(path)`. Every section is data already rendered: nothing is
    fetched when the file is opened (no scripts, no network)."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> "Report":
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def pre(self, text: str) -> "Report":
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, df, float_format: str = "{:.3f}") -> "Report":
        self.parts.append(df.to_html(index=False, float_format=float_format.format, border=0))
        return self

    def figure(self, fig, dpi: int = 110) -> "Report":
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(f'<img src="data:image/png;base64,{data}"/>')
        return self

    def raw(self, fragment: str) -> "Report":
        """A block of HTML as given (e.g. a circuitsvis view's `OfflinePage.fragment`, its script inlined,
        so the file still fetches nothing)."""
        self.parts.append(fragment)
        return self

    def html(self) -> str:
        body = "\n".join(self.parts)
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        return path
