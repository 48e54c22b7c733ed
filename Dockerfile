# radixfleet image: one image for the router and the workers (the command picks the role).
# GPU hosts: build with the default CUDA torch; CPU-only hosts: --build-arg TORCH_SPEC="torch==2.13.0 --index-url <cpu index>"
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.11"
ENV PYTHONUNBUFFERED=1 RADIXFLEET_HOME=/models
WORKDIR /app
RUN pip install --no-cache-dir ${TORCH_SPEC} "triton>=3.6"
COPY pyproject.toml README.md ./
COPY router router
COPY worker worker
COPY kernels kernels
COPY bench bench
RUN pip install --no-cache-dir .
VOLUME /models
EXPOSE 8000
ENTRYPOINT ["radixfleet"]
