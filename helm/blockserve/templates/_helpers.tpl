{{/* Names, labels, checks and the Serve config document of the blockserve chart. */}}

{{- define "blockserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "blockserve.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "blockserve.labels" -}}
{{ include "blockserve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "blockserve.grpcPort" -}}
{{- required "config.server.grpc_port is required: the gRPC proxy port (values.yaml sets 9000)" .Values.config.server.grpc_port -}}
{{- end -}}

{{/*
The Serve config document: cluster/serve_config.py render_serve_config builds the same one from a
ClusterConfig (tests/helm holds them equal). The application's args are .Values.config as written: defaults
are applied by the app builder from cluster/config.py.
*/}}
{{- define "blockserve.serveConfig" -}}
{{- $server := .Values.config.server -}}
{{- $http := dict "host" (required "config.server.host is required (0.0.0.0 in a pod)" $server.host) "port" (required "config.server.http_port is required" $server.http_port) -}}
{{- /* HTTPS at the HTTP proxy (cluster/config.py ServerSection.http_tls_options; tls.http defaults to true) */ -}}
{{- $tls := dig "tls" (dict) $server -}}
{{- if and $tls.cert_file (dig "http" true $tls) -}}
{{- $_ := set $http "ssl_certfile" $tls.cert_file -}}
{{- $_ := set $http "ssl_keyfile" $tls.key_file -}}
{{- if $tls.client_ca_file -}}{{- $_ := set $http "ssl_ca_certs" $tls.client_ca_file -}}{{- end -}}
{{- end -}}
{{- $servicers := list "deployments.wire.add_BlockDiffusion_to_server" "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" -}}
{{- $grpc := dict "port" (include "blockserve.grpcPort" . | int) "grpc_servicer_functions" $servicers -}}
{{- $app := dict "name" "blockserve" "route_prefix" "/" "import_path" "cluster.app:app_builder" "args" .Values.config -}}
{{- /* application-level SLO policy (cluster/serve_config.py application): its kwargs come from the Engine */ -}}
{{- if dig "engine" "autoscaling" nil .Values.config -}}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" "cluster.autoscaling:ApplicationPolicy") -}}
{{- end -}}
{{- toPrettyJson (dict "proxy_location" "EveryNode" "http_options" $http "grpc_options" $grpc "applications" (list $app)) -}}
{{- end -}}

{{/*
GPUs the Serve deployments ask for: Engine replicas x engine.num_gpus when model.device is cuda (cluster/app.py
engine_actor_options; num_gpus defaults to 1), plus (disaggregated mode) shards x
replicas_per_shard x experts.num_gpus, times the Engine replicas when engine.autoscaling is set (the shards then
scale with the Engines, cluster/app.py shard_scaling). Argument: a dict with "root" (the chart context) and "engines" (the
Engine replica count to size for). Prints a number.
*/}}
{{- define "blockserve.gpusNeeded" -}}
{{- $c := .root.Values.config -}}
{{- $onGpu := hasPrefix "cuda" (dig "model" "device" "cpu" $c) -}}
{{- $engineGpus := ternary (mulf .engines (dig "engine" "num_gpus" 1.0 $c)) 0.0 $onGpu -}}
{{- $shardGpus := 0.0 -}}
{{- if eq (dig "engine" "execution_mode" "fused" $c) "disaggregated" -}}
{{- $x := dig "experts" (dict) $c -}}
{{- $shards := ternary (len ($x.split | default list)) ($x.shards | default 0) (not (empty $x.split)) -}}
{{- $shardGpus = mulf $shards ($x.replicas_per_shard | default 1) ($x.num_gpus | default 0) -}}
{{- if dig "engine" "autoscaling" nil $c -}}
{{- /* the application-level policy runs replicas_per_shard of each shard per Engine replica */ -}}
{{- $shardGpus = mulf $shardGpus .engines -}}
{{- end -}}
{{- end -}}
{{- addf $engineGpus $shardGpus -}}
{{- end -}}

{{/* Engine replicas at deploy time and at most (engine.replicas defaults to 1 in cluster/config.py). */}}
{{- define "blockserve.minEngines" -}}
{{- dig "engine" "autoscaling" "min_replicas" (dig "engine" "replicas" 1 .Values.config) .Values.config -}}
{{- end -}}
{{- define "blockserve.maxEngines" -}}
{{- dig "engine" "autoscaling" "max_replicas" (dig "engine" "replicas" 1 .Values.config) .Values.config -}}
{{- end -}}

{{/* Ray's Prometheus port on every pod: config.server.metrics_port (default in cluster/config.py). */}}
{{- define "blockserve.metricsPort" -}}
{{- dig "server" "metrics_port" 8080 .Values.config -}}
{{- end -}}

{{/* Render-time checks the values schema cannot express; each message says what to change. */}}
{{- define "blockserve.checks" -}}
{{- $c := .Values.config -}}
{{- $x := dig "experts" (dict) $c -}}
{{- if and (eq (dig "engine" "execution_mode" "fused" $c) "disaggregated") $x.split -}}
{{- $sum := 0 -}}
{{- range $x.split -}}{{- $sum = add $sum . -}}{{- end -}}
{{- if ne (int $sum) (int .Values.checkpoint.numExperts) -}}
{{- fail (printf "config.experts.split %v sums to %d but checkpoint.numExperts is %d: make the split sum to the checkpoint's expert count" $x.split (int $sum) (int .Values.checkpoint.numExperts)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.checkpoint.pvc.claimName .Values.checkpoint.download.enabled -}}
{{- fail "set either checkpoint.pvc.claimName or checkpoint.download.enabled, not both" -}}
{{- end -}}
{{- if and .Values.checkpoint.download.enabled (not .Values.checkpoint.download.repo) -}}
{{- fail "checkpoint.download.enabled needs checkpoint.download.repo (a Hub repository id)" -}}
{{- end -}}
{{- $tls := dig "server" "tls" (dict) $c -}}
{{- if and $tls.cert_file (not .Values.tls.secretName) -}}
{{- fail "config.server.tls.cert_file is set: name the Secret holding it in tls.secretName (it is mounted at tls.mountPath)" -}}
{{- end -}}
{{- if and .Values.tls.secretName (not $tls.cert_file) -}}
{{- fail (printf "tls.secretName is set: point config.server.tls.cert_file and key_file at its files, e.g. %s/tls.crt and %s/tls.key" .Values.tls.mountPath .Values.tls.mountPath) -}}
{{- end -}}
{{- range $name := list "cert_file" "key_file" "client_ca_file" -}}
{{- $path := get $tls $name | default "" -}}
{{- if and $path (not (hasPrefix $.Values.tls.mountPath $path)) -}}
{{- fail (printf "config.server.tls.%s %s must lie under tls.mountPath %s, where the Secret is mounted" $name $path $.Values.tls.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if and $tls.cert_file (dig "http" true $tls) -}}
{{- fail "config.server.tls: set http: false under KubeRay (its readiness probe and the operator's proxy health check call http://...:http_port/-/healthz in plaintext, so HTTPS there keeps pods unready); terminate HTTPS at the ingress" -}}
{{- end -}}
{{- if and (or .Values.checkpoint.pvc.claimName .Values.checkpoint.download.enabled) (not (hasPrefix .Values.checkpoint.mountPath (dig "model" "path" "" $c))) -}}
{{- fail (printf "config.model.path must lie under checkpoint.mountPath %s, where the checkpoint volume is mounted" .Values.checkpoint.mountPath) -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray container: telemetry (Serve's tracing variables reach the proxies only from the environment in Ray 2.60). */}}
{{- define "blockserve.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- /* cluster/serve_fixes.py in every Ray worker process (what `blockserve serve` names in ray.init's runtime_env:
Ray reads this variable when a worker starts and runs the function it names) */}}
- name: __RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR
  value: cluster.serve_fixes.apply
{{- $tls := dig "server" "tls" (dict) .Values.config }}
{{- if $tls.cert_file }}
{{- /* where the gRPC proxy finds its certificate (cluster/tls.py tls_env) */}}
- name: BLOCKSERVE_TLS_CERT_FILE
  value: {{ $tls.cert_file | quote }}
- name: BLOCKSERVE_TLS_KEY_FILE
  value: {{ $tls.key_file | quote }}
{{- if $tls.client_ca_file }}
- name: BLOCKSERVE_TLS_CLIENT_CA_FILE
  value: {{ $tls.client_ca_file | quote }}
{{- end }}
{{- end }}
{{- $t := dig "telemetry" (dict) .Values.config }}
{{- /* the variables of cluster/telemetry.py's tracing_env, from config.telemetry (defaults: cluster/config.py) */}}
- name: OTEL_SERVICE_NAME
  value: {{ $t.service_name | default "blockserve" | quote }}
- name: RAY_SERVE_TRACING_SAMPLING_RATIO
  value: {{ hasKey $t "sampling_ratio" | ternary $t.sampling_ratio 1.0 | quote }}
{{- if $t.otlp_endpoint }}
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ $t.otlp_endpoint | quote }}
{{- if .Values.telemetry.exporterImportPath }}
- name: RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH
  value: {{ .Values.telemetry.exporterImportPath | quote }}
{{- end }}
{{- end }}
{{- if .Values.checkpoint.download.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.checkpoint.download.tokenSecret }}
      key: {{ .Values.checkpoint.download.tokenKey }}
{{- end }}
{{- end -}}

{{- define "blockserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if or .Values.checkpoint.pvc.claimName .Values.checkpoint.download.enabled }}
- name: checkpoint
  mountPath: {{ .Values.checkpoint.mountPath }}
  readOnly: {{ not .Values.checkpoint.download.enabled }}
{{- end }}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "blockserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.gpu.shmSize }}
{{- if .Values.checkpoint.pvc.claimName }}
- name: checkpoint
  persistentVolumeClaim:
    claimName: {{ .Values.checkpoint.pvc.claimName }}
    readOnly: true
{{- else if .Values.checkpoint.download.enabled }}
- name: checkpoint
  emptyDir:
    sizeLimit: {{ .Values.checkpoint.download.sizeLimit }}
{{- end }}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{/* Init container that downloads the checkpoint into config.model.path (huggingface_hub ships with tokenizers). */}}
{{- define "blockserve.initContainers" -}}
{{- if .Values.checkpoint.download.enabled }}
initContainers:
  - name: download-checkpoint
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["python", "-c"]
    args:
      - |
        import os
        from huggingface_hub import snapshot_download
        snapshot_download(os.environ["REPO"], revision=os.environ["REVISION"], local_dir=os.environ["TARGET"])
    env:
      - name: REPO
        value: {{ .Values.checkpoint.download.repo | quote }}
      - name: REVISION
        value: {{ .Values.checkpoint.download.revision | quote }}
      - name: TARGET
        value: {{ dig "model" "path" "" .Values.config | quote }}
      {{- include "blockserve.env" . | nindent 6 }}
    volumeMounts:
      {{- include "blockserve.volumeMounts" . | nindent 6 }}
{{- end }}
{{- end -}}
