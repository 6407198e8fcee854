"""Blind A/B votes from the playground (`votes`) and the ratings computed from them (`ratings`)."""
