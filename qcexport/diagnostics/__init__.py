"""Query-conditioning diagnostics: attention maps as model outputs, metrics and rendering."""
