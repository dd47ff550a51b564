{{- define "graywatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "graywatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "graywatch.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "graywatch.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "graywatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "graywatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "graywatch.selector" -}}
app.kubernetes.io/name: {{ include "graywatch.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "graywatch.agent.serviceAccount" -}}
{{- default (printf "%s-agent" (include "graywatch.fullname" .)) .Values.serviceAccount.agent.name }}
{{- end }}

{{- define "graywatch.aggregator.serviceAccount" -}}
{{- default (printf "%s-aggregator" (include "graywatch.fullname" .)) .Values.serviceAccount.aggregator.name }}
{{- end }}

{{- define "graywatch.aggregator.lease" -}}
{{- printf "%s-aggregator" (include "graywatch.fullname" .) }}
{{- end }}

{{/* Mode checks; every template includes this so a bad value fails the render. */}}
{{- define "graywatch.validate" -}}
{{- if not (has .Values.mode (list "dry-run" "nrc" "direct-taint")) }}
{{- fail (printf "mode must be one of dry-run, nrc, direct-taint (got %q)" .Values.mode) }}
{{- end }}
{{- if or (le (float64 .Values.blastRadius.fraction) 0.0) (gt (float64 .Values.blastRadius.fraction) 0.2) }}
{{- fail "blastRadius.fraction must be in (0, 0.2]: Karpenter's own node repair stops at 20% unhealthy" }}
{{- end }}
{{- if and .Values.nodeReadinessRules.create (ne .Values.mode "nrc") }}
{{- fail "nodeReadinessRules.create needs mode: nrc (in the other modes nothing turns the conditions into NRC taints consistently)" }}
{{- end }}
{{- if ge (float64 .Values.thresholds.recoverConfidence) (float64 .Values.thresholds.degradeConfidence) }}
{{- fail "thresholds.recoverConfidence must be below thresholds.degradeConfidence (hysteresis)" }}
{{- end }}
{{- $lease := int64 .Values.aggregator.leaseDurationMs }}
{{- if or (lt $lease 1000) (ne (mod $lease 1000) 0) }}
{{- fail "aggregator.leaseDurationMs must be a whole number of seconds, at least 1000" }}
{{- end }}
{{- if or (le (int64 .Values.aggregator.renewIntervalMs) 0) (ge (int64 .Values.aggregator.renewIntervalMs) $lease) }}
{{- fail "aggregator.renewIntervalMs must be positive and below aggregator.leaseDurationMs" }}
{{- end }}
{{- $pdb := .Values.aggregator.pdb.minAvailable }}
{{- if and (or (kindIs "float64" $pdb) (kindIs "int64" $pdb)) (ge (int64 $pdb) (int64 .Values.aggregator.replicas)) }}
{{- fail "aggregator.pdb.minAvailable must be below aggregator.replicas, or node drains block forever" }}
{{- end }}
{{- if and .Values.karpenter.replaceNodes (not .Values.karpenter.enabled) }}
{{- fail "karpenter.replaceNodes needs karpenter.enabled" }}
{{- end }}
{{- end }}

{{/*
The mode an aggregator.toml was rendered for ("" when it is not one of ours): dry_run = true →
dry-run, else taint_mode "nrc" → nrc, "direct" → direct-taint.
*/}}
{{- define "graywatch.modeOfConfig" -}}
{{- if regexMatch "(?m)^\\s*dry_run\\s*=\\s*true\\s*(#.*)?$" . }}dry-run
{{- else if regexMatch "(?m)^\\s*taint_mode\\s*=\\s*\"nrc\"" . }}nrc
{{- else if regexMatch "(?m)^\\s*taint_mode\\s*=\\s*\"direct\"" . }}direct-taint
{{- end }}
{{- end }}

{{/*
The mode the release runs in now, from the live aggregator ConfigMap (`lookup`): "" under
`helm template`, `--dry-run` and on a first install (lookup returns nothing), then no
mode-change hook renders.
*/}}
{{- define "graywatch.previousMode" -}}
{{- $cm := lookup "v1" "ConfigMap" .Release.Namespace (printf "%s-aggregator" (include "graywatch.fullname" .)) }}
{{- if $cm }}
{{- include "graywatch.modeOfConfig" (index ($cm.data | default dict) "aggregator.toml" | default "") }}
{{- end }}
{{- end }}

{{/*
What a mode change must remove before the new mode runs (dict "previous" "mode"): "all" (our
taint, NodePool changes and conditions) going to dry-run from a mode that wrote; "taint" from
direct-taint to nrc (the conditions stay: NRC taints from them); "" otherwise (from dry-run,
which wrote nothing; to direct-taint, which owns our taint and conditions; mode unchanged).
*/}}
{{- define "graywatch.modeChangeScope" -}}
{{- if and (has .previous (list "nrc" "direct-taint")) (ne .previous .mode) }}
{{- if eq .mode "dry-run" }}all
{{- else if and (eq .previous "direct-taint") (eq .mode "nrc") }}taint
{{- end }}
{{- end }}
{{- end }}

{{/* Writes happen in every mode but dry-run. */}}
{{- define "graywatch.writes" -}}
{{- if ne .Values.mode "dry-run" }}true{{ end }}
{{- end }}

{{/*
policy/v1 PodDisruptionBudget from Kubernetes 1.21; 1.20 has policy/v1beta1 only. Against a cluster
the API versions come from discovery; `helm template` has a fixed list (which contains policy/v1),
so the Kubernetes version (--kube-version) decides too.
*/}}
{{- define "graywatch.pdb.apiVersion" -}}
{{- $apis := .Capabilities.APIVersions -}}
{{- if and (or ($apis.Has "policy/v1/PodDisruptionBudget") ($apis.Has "policy/v1")) (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{/* A TOML float: whole numbers get a .0 so they stay floats. */}}
{{- define "graywatch.float" -}}
{{- $f := float64 . -}}
{{- if eq $f (floor $f) }}{{ printf "%.1f" $f }}{{ else }}{{ $f }}{{ end -}}
{{- end }}
