"""The driver side of onalign: config, iteration loop, reports, CLI."""
