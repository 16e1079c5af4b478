"""The tools around the core: the demo, bench (and max-context search), the planner and its cost
model, sampled verification, memory measurement and the local launcher. The core
(``ringattn.api``, ``engine``, ``comm``, ``layout``, ``masks``, ``merge``, ``kernels``,
``rotation``, ``inference``, ``integrations``) imports nothing from here."""
