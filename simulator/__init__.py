"""The engine: config, driver loop, coordinator and worker actors, tracking, CLI.

This is the only package that imports ray or mlflow (lazily, where they are needed).
"""
