"""HTTP-facing layer: request schemas, tokenizer and chat template, detokenization, stop strings,
and the request pipeline shared by Truss predict and the OpenAI routes."""
