// The public HTTP API, and its uniform errors turned into sentences a person can act on.

export class ApiError extends Error {
  constructor(status, code, message, param, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

export function createApi(getKey) {
  async function request(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new ApiError(0, "network", "The server cannot be reached. Is it running?", null);
    }
    const payload = await response.json().catch(() => null);
    if (!response.ok) {
      const error = (payload && payload.error) || {};
      throw new ApiError(
        response.status,
        error.code || "http_error",
        error.message || `${response.status} ${response.statusText}`,
        error.param || null,
        response.headers.get("Retry-After"),
      );
    }
    return payload;
  }
  // <img src> cannot send a key: with one, outputs are fetched and shown as blob URLs.
  async function imageUrl(url) {
    const key = getKey();
    if (!key) return url;
    let response;
    try {
      response = await fetch(url, { headers: { Authorization: `Bearer ${key}` } });
    } catch {
      throw new ApiError(0, "network", "The server cannot be reached. Is it running?", null);
    }
    if (!response.ok) throw new ApiError(response.status, "download", "the image could not be loaded", null);
    return URL.createObjectURL(await response.blob());
  }
  return {
    imageUrl,
    models: () => request("GET", "/v1/models"),
    readiness: (model) =>
      request("GET", model ? `/readyz?model=${encodeURIComponent(model)}` : "/readyz"),
    create: (body) => request("POST", "/v1/generations", body),
    get: (id) => request("GET", `/v1/generations/${id}`),
    cancel: (id) => request("POST", `/v1/generations/${id}/cancel`),
  };
}

// A 429's code says which limit was hit: the model's queue, or the caller's pace or jobs in flight.
const LIMITS = new Map([
  ["queue_full", "The queue is full"],
  ["rate_limited", "Too many requests"],
  ["too_many_active_jobs", "Too many generations queued or running at once"],
]);

export function describeError(error) {
  switch (error.status) {
    case 0:
      return error.message;
    case 401:
    case 403:
      return `Not allowed: ${error.message} (set an API key below).`;
    case 422:
      return `Invalid ${error.param || "request"}: ${stripParam(error.message, error.param)}`;
    case 429: {
      const limit = LIMITS.get(error.code);
      const why = limit ? `${limit} (${error.message})` : `Refused for now: ${error.message}`;
      return `${why}. Try again in ${error.retryAfter || "a few"} s.`;
    }
    case 503:
      return `The service cannot take jobs right now: ${error.message}`;
    default:
      return `${error.status} ${error.code}: ${error.message}`;
  }
}

function stripParam(message, param) {
  const prefix = param ? `${param}: ` : "";
  return message.startsWith(prefix) ? message.slice(prefix.length) : message;
}
