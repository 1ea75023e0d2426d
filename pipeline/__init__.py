"""The driver side of onalign: the checks before start-up, Ray and the actors, the iteration loop, run
directories, reports and the CLI. The config schema lives in `common.config`."""
