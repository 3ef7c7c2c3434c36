{{/*
Names and labels (app.kubernetes.io/*), the effective Turnout configuration, and the vLLM
side: which upstreams the chart runs, their settings and their `vllm serve` arguments.
*/}}

{{- define "turnout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "turnout.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "turnout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "turnout.labels" -}}
helm.sh/chart: {{ include "turnout.chart" . }}
{{ include "turnout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: turnout
{{- end }}

{{- define "turnout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "turnout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The gateway's pods. */}}
{{- define "turnout.gatewaySelectorLabels" -}}
{{ include "turnout.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "turnout.redisName" -}}
{{- printf "%s-redis" (include "turnout.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "turnout.redisSelectorLabels" -}}
{{ include "turnout.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "turnout.gatewayImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Redis URL the gateway uses: the bundled one, the external one, or "". */}}
{{- define "turnout.redisUrl" -}}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "redis: set either redis.enabled (the bundled Redis) or redis.url (your own), not both" }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "turnout.redisName" .) }}
{{- else if .Values.redis.url }}
{{- if regexMatch "^[a-z]+://[^/]*@" .Values.redis.url }}
{{- fail "redis.url must not hold credentials: it is written into a ConfigMap" }}
{{- end }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* A DNS-1123 label from an upstream name (lower case, [a-z0-9-]). */}}
{{- define "turnout.dnsLabel" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trimAll "-" }}
{{- end }}

{{/*
The upstreams the chart runs vLLM for, as YAML {name: {upstream, settings, name, label}}:
`kind: vllm` with a `serve` section and no `urls`. `settings` are the `vllm` values with the
upstream's overrides (vllm.upstreams.<name>) merged over them; `name` is the StatefulSet's and
headless Service's name.
*/}}
{{- define "turnout.vllmUpstreams" -}}
{{- $root := . }}
{{- $out := dict }}
{{- $seen := dict }}
{{- range $name, $u := (.Values.config.upstreams | default dict) }}
{{- if and (kindIs "map" $u) (eq (toString $u.kind) "vllm") $u.serve (empty $u.urls) }}
{{- $defaults := omit (deepCopy $root.Values.vllm) "upstreams" }}
{{- $override := deepCopy (get ($root.Values.vllm.upstreams | default dict) $name | default dict) }}
{{- $settings := mergeOverwrite $defaults $override }}
{{- $label := include "turnout.dnsLabel" $name }}
{{- $full := printf "%s-vllm-%s" (include "turnout.fullname" $root) $label | trunc 52 | trimSuffix "-" }}
{{- if hasKey $seen $full }}
{{- fail (printf "config.upstreams: %q and %q both make the vLLM name %q; rename one" (get $seen $full) $name $full) }}
{{- end }}
{{- $_ := set $seen $full $name }}
{{- $tp := $u.serve.tensor_parallel_size }}
{{- $gpus := $settings.gpus }}
{{- if kindIs "invalid" $gpus }}
{{- $gpus = (kindIs "invalid" $tp) | ternary 1 $tp }}
{{- end }}
{{- $gpus = int64 $gpus }}
{{- if and (not (kindIs "invalid" $tp)) (lt $gpus (int64 $tp)) }}
{{- fail (printf "upstream %s: %d GPUs per pod cannot hold tensor_parallel_size %d" $name $gpus (int64 $tp)) }}
{{- end }}
{{- if and $u.gpu (ne (int64 ($u.gpu.count | default 1)) $gpus) }}
{{- fail (printf "upstream %s: gpu.count (%d) must equal the GPUs per pod (%d), or its cost is wrong" $name (int64 ($u.gpu.count | default 1)) $gpus) }}
{{- end }}
{{- $_ := set $settings "gpus" $gpus }}
{{- $_ := set $out $name (dict "upstream" $u "settings" $settings "name" $full "label" ($label | trunc 63 | trimSuffix "-")) }}
{{- end }}
{{- end }}
{{- range $name, $_ := ($root.Values.vllm.upstreams | default dict) }}
{{- if not (hasKey $out $name) }}
{{- fail (printf "vllm.upstreams.%s: no `kind: vllm` upstream of that name with a `serve` section and no `urls` in config.upstreams" $name) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* A number the way Python's str() writes it: ints as ints, floats with a decimal point. */}}
{{- define "turnout.pyInt" -}}
{{- int64 . | toString }}
{{- end }}
{{- define "turnout.pyFloat" -}}
{{- $f := float64 . }}
{{- if eq $f (floor $f) }}{{ printf "%.1f" $f }}{{ else }}{{ toString $f }}{{ end }}
{{- end }}

{{/*
The vLLM container's arguments, as a YAML list, for dict "serve" <serve section> "port" <port>:
--model <base_model> --host <serve.host> --port <port>, then exactly what
serving.vllm_command.serve_args(serve) gives, in its order. Adapters come in key order (a
Helm map is sorted), the order Turnout reads them from the rendered ConfigMap.
*/}}
{{- define "turnout.vllmArgs" -}}
{{- $s := .serve }}
{{- $args := list "--model" (toString $s.base_model) "--host" (toString ($s.host | default "0.0.0.0")) "--port" (include "turnout.pyInt" .port) }}
{{- if not (kindIs "invalid" $s.served_model_name) }}
{{- $args = concat $args (list "--served-model-name" (toString $s.served_model_name)) }}
{{- end }}
{{- $adapters := $s.adapters | default dict }}
{{- if or (not (empty $adapters)) (not (kindIs "invalid" $s.max_loras)) }}
{{- $args = append $args "--enable-lora" }}
{{- end }}
{{- $atStart := list }}
{{- range $name, $a := $adapters }}
{{- if kindIs "string" $a }}
{{- $atStart = append $atStart (printf "%s=%s" $name $a) }}
{{- else if or (not (hasKey $a "at_start")) (kindIs "invalid" $a.at_start) $a.at_start }}
{{- $atStart = append $atStart (printf "%s=%s" $name (toString $a.path)) }}
{{- end }}
{{- end }}
{{- if $atStart }}
{{- $args = concat $args (list "--lora-modules") $atStart }}
{{- end }}
{{- range $flag := list "max_model_len" "max_loras" "max_lora_rank" "dtype" "gpu_memory_utilization" "tensor_parallel_size" }}
{{- $v := index $s $flag }}
{{- if and (hasKey $s $flag) (not (kindIs "invalid" $v)) }}
{{- $text := "" }}
{{- if eq $flag "dtype" }}
{{- $text = toString $v }}
{{- else if eq $flag "gpu_memory_utilization" }}
{{- $text = include "turnout.pyFloat" $v }}
{{- else }}
{{- $text = include "turnout.pyInt" $v }}
{{- end }}
{{- $args = concat $args (list (printf "--%s" ($flag | replace "_" "-")) $text) }}
{{- end }}
{{- end }}
{{- range $a := ($s.extra_args | default list) }}
{{- $args = append $args (toString $a) }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* The Turnout configuration the gateway reads, as YAML (see `config` in values.yaml). */}}
{{- define "turnout.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if and (empty $cfg.upstreams) (empty $cfg.variants) (empty $cfg.routes) }}
{{- $demo := .Files.Get "files/demo-config.yaml" | fromYaml }}
{{- range $section := list "upstreams" "variants" "routes" }}
{{- $_ := set $cfg $section (get $demo $section) }}
{{- end }}
{{- end }}
{{- $ns := .Release.Namespace }}
{{- range $name, $v := (include "turnout.vllmUpstreams" . | fromYaml) }}
{{- $urls := list }}
{{- range $i := until (int $v.settings.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:%d" $v.name $i $v.name $ns (int64 $v.settings.port)) }}
{{- end }}
{{- $_ := set (get $cfg.upstreams $name) "urls" $urls }}
{{- end }}
{{- $state := $cfg.state | default dict }}
{{- $redisUrl := include "turnout.redisUrl" . }}
{{- if $redisUrl }}
{{- if $state.redis_url }}
{{- fail "config.state.redis_url: leave it out; the chart sets it from redis.enabled or redis.url" }}
{{- end }}
{{- $_ := set $state "redis_url" $redisUrl }}
{{- end }}
{{- $pods := .Values.autoscaling.enabled | ternary .Values.autoscaling.maxReplicas .Values.replicaCount }}
{{- $processes := mul (int64 $pods) (int64 .Values.workers) }}
{{- if and (not $state.redis_url) (gt (int64 $processes) 1) (not .Values.allowPerPodState) }}
{{- fail "several gateway processes need shared state: set redis.enabled or redis.url (or allowPerPodState, where every limit then counts per pod)" }}
{{- end }}
{{- if and $state.redis_url (not (hasKey $state "replicas")) }}
{{- $_ := set $state "replicas" $processes }}
{{- end }}
{{- if $state }}
{{- $_ := set $cfg "state" $state }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Every environment variable the configuration names for a secret must have a secretEnv entry;
renders the gateway's env entries for them.
*/}}
{{- define "turnout.secretEnvNames" -}}
{{- $cfg := include "turnout.config" . | fromYaml }}
{{- $names := list }}
{{- if $cfg.admin_key_env }}
{{- $names = append $names (list "admin_key_env" $cfg.admin_key_env) }}
{{- end }}
{{- range $name, $u := $cfg.upstreams }}
{{- if $u.api_key_env }}
{{- $names = append $names (list (printf "upstreams.%s.api_key_env" $name) $u.api_key_env) }}
{{- end }}
{{- end }}
{{- range $pair := $names }}
{{- if not (hasKey $.Values.secretEnv (index $pair 1)) }}
{{- fail (printf "config %s names %s: add secretEnv.%s: {secretName: ..., key: ...}" (index $pair 0) (index $pair 1) (index $pair 1)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "turnout.secretKeyRef" -}}
valueFrom:
  secretKeyRef:
    name: {{ .secretName | quote }}
    key: {{ .key | quote }}
{{- end }}
