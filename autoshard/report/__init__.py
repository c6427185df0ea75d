"""Reports: tables, JSON and plots that show a graph or a plan to a person."""
