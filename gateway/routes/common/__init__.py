"""Helpers shared by the route modules (not routes themselves): body parsing, route classes per
API family, JSON and SSE responses, and the FastAPI dependencies."""
