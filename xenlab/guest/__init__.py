"""Guests: what one is made of (spec), the manager that runs them through the dom0 agent, and the Guest handle."""
