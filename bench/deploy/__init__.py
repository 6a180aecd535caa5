"""Deployment benchmark: moving a user's upper layer from a login node to a compute node.

``harness`` holds the interface a deploy method implements (:class:`~bench.deploy.harness.
DeployMethod`) and the records it gets and returns; ``run`` is the command-line harness;
``plot`` draws the SVG. Extra methods live in ``bench/deploy/*_method.py`` modules that
define ``METHODS``; ``run`` imports them when they exist.
"""
