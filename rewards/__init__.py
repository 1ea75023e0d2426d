"""Reward scoring, OPTune prompt selection and preference-pair building."""
