"""The Keras tests run on the backend named by KERAS_BACKEND (the root conftest defaults to jax)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
