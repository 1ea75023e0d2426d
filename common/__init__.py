"""What every layer shares: config types, records, errors, the method registry and progress counters.

The bottom of the import stack (tests/unit/test_layering.py): `rewards/` and `workers/` import only this
package, `pipeline/` imports them all, and nothing here imports a package above it."""
