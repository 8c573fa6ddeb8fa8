-- Argo CD health check for recsys.dev/RecommenderSystem.
-- Install under argocd-cm: resource.customizations.health.recsys.dev_RecommenderSystem
-- Healthy: Ready=True for the current generation and no rollout in progress.
-- Progressing: not reconciled yet, pods starting, or a canary rollout running.
-- Suspended: a canary that passed its analyses waits for a person (confirmPromotion).
-- Degraded: a spec/policy/credentials problem that waiting will not fix, or a rolled-back rollout.
local hs = {}
local permanent = {
  InvalidSpec = true, ScalingPolicyNotFound = true, ScalingPolicyInvalid = true,
  PolicyViolation = true, PulsarUnauthorized = true, PulsarForbidden = true,
  TopicPartitionsDecreased = true, TrainingEngineNotServed = true,
}

local function find(conditions, wanted)
  if conditions == nil then return nil end
  for _, c in ipairs(conditions) do
    if c.type == wanted then return c end
  end
  return nil
end

local generation = nil
if obj.metadata ~= nil then generation = obj.metadata.generation end
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile"
  return hs
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local ready = find(status.conditions, "Ready")
if ready == nil or (generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for an up-to-date Ready condition"
  return hs
end

local rollout = find(status.conditions, "RolloutHealthy")
if rollout ~= nil and rollout.status == "False" then
  hs.status = "Degraded"
  hs.message = (rollout.reason or "RolloutFailed") .. ": " .. (rollout.message or "")
  return hs
end

if ready.status == "True" then
  if status.canary ~= nil and status.canary.version ~= nil then
    if status.canary.phase == "AwaitingPromotion" then
      -- As Argo Rollouts shows a paused rollout: it waits for a person, not for time.
      hs.status = "Suspended"
      hs.message = "Canary " .. status.canary.version .. " at " .. tostring(status.canary.weight or 0) .. "% awaits promotion by a person"
      return hs
    end
    hs.status = "Progressing"
    hs.message = "Canary " .. status.canary.version .. " at " .. tostring(status.canary.weight or 0) .. "%"
    return hs
  end
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

if ready.status == "False" and permanent[ready.reason] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
