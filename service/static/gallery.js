// This browser's recent jobs, in localStorage: no accounts, nothing kept on the server's side.

const STORAGE_KEY = "selfcascade.recent";
const MAX_ENTRIES = 12;

export function loadRecent() {
  try {
    const entries = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

export function remember(job) {
  // A still for the thumbnail: an image, or a video's poster (an <img> cannot show an mp4).
  const output = job.outputs.find((o) => o.role !== "video") || job.outputs[0];
  const entry = {
    id: job.id,
    prompt: job.params.prompt,
    width: job.params.width,
    height: job.params.height,
    seed: job.params.seed,
    url: output ? output.url : null,
  };
  const entries = [entry, ...loadRecent().filter((e) => e.id !== job.id)].slice(0, MAX_ENTRIES);
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(entries));
  } catch {
    // Storage full or disabled (private mode): the gallery is a convenience, not a record.
  }
  return entries;
}

export function renderGallery(list, entries, onOpen, imageUrl) {
  list.replaceChildren();
  if (entries.length === 0) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = "Nothing yet: finished images show up here.";
    list.append(empty);
    return;
  }
  for (const entry of entries) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${entry.prompt} (${entry.width}×${entry.height}, seed ${entry.seed})`;
    button.setAttribute("aria-label", `Open “${entry.prompt}”, ${entry.width}×${entry.height}`);
    if (entry.url) {
      const img = document.createElement("img");
      img.alt = "";
      img.loading = "lazy";
      // Results expire on the server; an old entry keeps its caption without a broken image.
      img.addEventListener("error", () => img.remove());
      imageUrl(entry.url).then((src) => { img.src = src; }, () => img.remove());
      button.append(img);
    }
    const caption = document.createElement("span");
    caption.textContent = `${entry.width}×${entry.height}`;
    button.append(caption);
    button.addEventListener("click", () => onOpen(entry.id));
    item.append(button);
    list.append(item);
  }
}
