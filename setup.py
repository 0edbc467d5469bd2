"""Build script. Pure Python today; the kernel extensions (csrc/) will be added here."""

from setuptools import setup

setup()
