"""Test support: tiny bundles and checkpoints built in seconds, shared by the tests of every stage."""
