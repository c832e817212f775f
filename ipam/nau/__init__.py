"""Network Address Usage (NAU): the rule table, and the planner built on it."""
