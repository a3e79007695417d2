"""`python -m detailflow_jax.demo`: see detailflow_jax/demo/run.py."""
import sys

from .run import main

sys.exit(main())
