"""The stages of :func:`~circuit_peft.recipe.pipeline.train` (and of ``amplify``, its CCA preset), each a small
unit reading and writing the shared :class:`~circuit_peft.recipe.context.RunContext`:

- :mod:`.select`: the training rows kept (CircuitSeer, IFD, random);
- :mod:`.locate`: the circuit (``circuit.json`` / ``circuit.png``);
- :mod:`.evaluate`: held-out accuracy (or completion loss) before and after, the base's token cap;
- :mod:`.fit`: the circuit trained, by pivotal SFT or by the CCA update (:class:`.fit.CCAUpdateSpec`);
- :mod:`.rates`: an arm trained at one rate or at the best of a learning-rate grid;
- :mod:`.side_effects`: MMLU / TruthfulQA / KL against the base;
- :mod:`.controls`: control arms trained like the circuit.
"""
