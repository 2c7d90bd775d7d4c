"""`analysis-daemon report`: one self-contained HTML page (inline SVG, no script) from results files."""
