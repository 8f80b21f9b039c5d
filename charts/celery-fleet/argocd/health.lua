-- Argo CD health of a CeleryWorkerPool or CeleryBeat, read from the conditions the operator writes
-- (argocd-cm: resource.customizations.health.celeryfleet.io_CeleryWorkerPool and ..._CeleryBeat).
-- A status older than the spec says nothing about the spec: wait for the operator to observe it.
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if (obj.status.observedGeneration or 0) < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, c in ipairs(obj.status.conditions) do
  conditions[c.type] = c
end
local function is_true(type_)
  return conditions[type_] ~= nil and conditions[type_].status == "True"
end
-- Stalled: only the user can fix it (the message says how); Degraded: broken, may still recover.
if is_true("Stalled") then
  return {status = "Degraded", message = conditions["Stalled"].message}
end
if is_true("Degraded") then
  return {status = "Degraded", message = conditions["Degraded"].message}
end
if obj.spec ~= nil and obj.spec.paused == true then
  return {status = "Suspended", message = "spec.paused is true: the operator does not change this object's workers"}
end
if is_true("Ready") then
  return {status = "Healthy", message = conditions["Ready"].message}
end
if conditions["Ready"] ~= nil then
  hs.message = conditions["Ready"].message
end
return hs
