// QSilk: tooltips on the accordion header and the preset chooser. Everything is looked up by
// element id and skipped when absent, so this is harmless on any page or WebUI version.
(function () {
    "use strict";

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function decorate() {
        ["txt2img", "img2img"].forEach(function (tab) {
            var prefix = "script_" + tab + "_qsilk_";
            var accordion = app().querySelector("#" + prefix + "enabled");
            var header = accordion && accordion.querySelector(".label-wrap, .label");
            if (header && !header.title) {
                header.title = "QSilk: the checkbox turns it on or off for this generation. " +
                    "Defaults are on the Settings page (QSilk).";
            }
            var preset = app().querySelector("#" + prefix + "preset");
            var hint = app().querySelector("#" + prefix + "preset_hint");
            if (preset && hint) {
                preset.title = (hint.textContent || "").trim();
            }
        });
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(decorate);
    }
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(decorate);  // the hint follows the values set
    }
})();
